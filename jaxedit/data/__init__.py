"""Data: CounterFact loaders, text corpora for C0, and where data and caches live."""
