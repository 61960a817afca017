"""From tiles to a place: describe, the Dask executor, the index, the self-test."""
