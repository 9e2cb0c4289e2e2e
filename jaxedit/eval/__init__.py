"""Evaluation: scoring (prompt, target) pairs, CounterFact metrics, generation entropy and tables."""
