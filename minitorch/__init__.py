"""minitorch: an educational autodiff framework with fused flash attention (exports filled in at integration)."""
