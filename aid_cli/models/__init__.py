"""Models by name: the catalogue (names → sources, licence, sha256; catalogue.py, entry.py), the cache (downloads,
conversions; cache.py) and the parameters tuned per backbone (tuned.py). Where files live: paths.py."""
