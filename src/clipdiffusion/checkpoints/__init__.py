"""Reading and writing model weights safely: safetensors, diffusers folders, family detection, layout tables."""
