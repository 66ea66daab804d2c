"""Balancing methods, one per file, registered by name in :data:`modbal.registry.METHODS`."""
from .agm import AGM
from .base import EpochData, Method
from .inforeg import InfoReg
from .joint import Joint
from .mla import MLA
from .mmpareto import MMPareto
from .mses import MSES
from .mslr import MSLR
from .ogm_ge import OGMGE
from .opm import OPM
from .unimodal import UniModal

__all__ = ["AGM", "EpochData", "InfoReg", "Joint", "MLA", "MSES", "MSLR", "MMPareto", "Method", "OGMGE", "OPM", "UniModal"]
