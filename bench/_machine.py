"""What every benchmark prints about the machine it ran on (bench scripts run as `python bench/NAME.py`, so this
module is importable beside them)."""

import platform
import subprocess


def machine() -> str:
    """The CPU model from lscpu, else whatever the platform module knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
