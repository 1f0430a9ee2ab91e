"""Models by name and where files live: the catalogue (names → sources, licence, sha256), the cache (downloads,
conversions), tuned parameters per backbone, and the paths (weights, caches, offline mode)."""
