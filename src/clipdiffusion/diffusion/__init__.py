"""The image side: UNet with cross-attention, VAE, denoiser wrappers and samplers."""
