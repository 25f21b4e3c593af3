"""Plain ``nn.Module``s: tensors in, tensors out. No Lightning, no data loading, no losses."""
