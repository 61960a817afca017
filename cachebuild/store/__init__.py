"""The shared content-addressed store: objects, locks, descriptors, thumbnails, S3, action cache, gc."""
