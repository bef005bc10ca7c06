"""Dataset readers, one module per released format (see each module's docstring)."""

from .coco_instances import COCOInstancesDataset
from .coco_interactive import COCOInteractiveDataset
from .coco_panoptic import COCOPanopticDataset
from .dam import DAMDataset
from .openimages import OpenImagesDataset
from .refcoco import RefCOCODataset
from .sa1b import SA1BDataset
from .sav import SAVDataset, SAVPairsDataset, write_sav_pairs

__all__ = ["COCOInstancesDataset", "COCOInteractiveDataset", "COCOPanopticDataset", "DAMDataset",
           "OpenImagesDataset", "RefCOCODataset", "SA1BDataset", "SAVDataset", "SAVPairsDataset", "write_sav_pairs"]
