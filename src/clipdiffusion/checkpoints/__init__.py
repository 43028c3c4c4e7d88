"""Reading and writing model weights safely: safetensors, diffusers folders, family detection, layout tables."""


def unfit_keys_error(source, component: str, to_diffusers: bool, unknown: list):
    """The one error a rename table raises: every key that does not fit, the first 20 named."""
    from ..errors import CheckpointError

    shown = ", ".join(unknown[:20]) + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
    layout = "LDM" if to_diffusers else "diffusers"
    return CheckpointError(source, f"{len(unknown)} {component} keys do not fit the {layout} layout of this config: "
                                   f"{shown}")
