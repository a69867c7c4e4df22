"""What an image set is: MVTec-style folders and their manifests (`layout`), dataset sources
(`sources`), downloads (`download`) and a torch Dataset over a manifest (`loading`, which alone
imports torch)."""
from ad_models.data.layout import (
    COLUMNS,
    DatasetError,
    read_manifest,
    scan_category,
    validate_manifest,
    write_manifest,
)

__all__ = ["COLUMNS", "DatasetError", "read_manifest", "scan_category", "validate_manifest", "write_manifest"]
