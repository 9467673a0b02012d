"""LoRA deltas: the pure algebra (factors, exact weighted sums, rank caps, similarity, in-place apply and remove) and
the PEFT adapter file format. No model loading, no command line, no printing."""
