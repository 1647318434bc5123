"""The cache: content-addressed objects, the action cache, the stat cache, integrity checks,
durability, hashed writers, the remote cache, gc and fsck."""
