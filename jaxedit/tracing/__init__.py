"""Causal tracing (Meng et al. 2022): which hidden states carry a fact the model knows.

  knowns   the known facts, tokenised, with the subject's token range
  lanes    how every restoration of a prompt is laid out to run in one program
  trace    clean, corrupted and restored runs of one fact (trace_fact; naive_trace runs one
           restoration per forward pass)
  groups   the paper's token groups and averages over facts
"""
from jaxedit.tracing.groups import TOKEN_GROUPS, average_by_group, token_groups
from jaxedit.tracing.knowns import (EncodedFact, KnownFact, KnownsFileError, SubjectTokensError, encode_fact,
                                    encode_facts, read_knowns, subject_token_ids)
from jaxedit.tracing.lanes import KINDS, restored_layers
from jaxedit.tracing.trace import (FactTrace, TraceConfig, embedding_noise_std, greedy_next_token, naive_trace,
                                   trace_fact)

__all__ = ["TOKEN_GROUPS", "average_by_group", "token_groups", "EncodedFact", "KnownFact", "KnownsFileError",
           "SubjectTokensError", "encode_fact", "encode_facts", "read_knowns", "subject_token_ids", "KINDS", "restored_layers",
           "FactTrace", "TraceConfig", "embedding_noise_std", "greedy_next_token", "naive_trace", "trace_fact"]
