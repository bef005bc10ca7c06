"""Dataset readers, one module per released format (see each module's docstring)."""

from .coco_instances import COCOInstancesDataset
from .coco_interactive import COCOInteractiveDataset
from .coco_panoptic import COCOPanopticDataset
from .dam import DAMDataset
from .openimages import OpenImagesDataset
from .own_coco import OwnCOCODataset
from .own_folder import OwnFolderDataset
from .own_sa2va import OwnSa2VADataset
from .refcoco import RefCOCODataset
from .sa1b import SA1BDataset
from .sav import SAVDataset, SAVPairsDataset, write_sav_pairs

#: the own-data kinds of a data config / ``maskloop data check --source`` (see own_common.py)
OWN_KINDS = {"coco": OwnCOCODataset, "folder": OwnFolderDataset, "sa2va": OwnSa2VADataset}

__all__ = ["OWN_KINDS", "OwnCOCODataset", "OwnFolderDataset", "OwnSa2VADataset", "COCOInstancesDataset", "COCOInteractiveDataset", "COCOPanopticDataset", "DAMDataset",
           "OpenImagesDataset", "RefCOCODataset", "SA1BDataset", "SAVDataset", "SAVPairsDataset", "write_sav_pairs"]
