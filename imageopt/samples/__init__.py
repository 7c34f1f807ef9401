"""Sample product images shipped with imageopt (CC0 or public domain)."""

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent


def sample_paths() -> list[Path]:
    """Every sample image, sorted by name."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in {".png", ".jpg"})
