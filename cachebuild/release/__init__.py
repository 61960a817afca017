"""What makes a build a cache: manifest, signing, rollback, atomic publish, the cache lock."""
