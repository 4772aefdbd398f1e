"""Mixed-precision training for PyTorch Lightning that is correct by default."""
