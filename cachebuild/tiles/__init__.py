"""The tiles of an area: tile math, the tile set, the fetch phase, MBTiles, the coverage map."""
