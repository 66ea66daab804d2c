"""Balancing methods, one per file, registered by name in :data:`modbal.registry.METHODS`."""
from .agm import AGM
from .base import EpochData, Method
from .gblend import GBlending
from .inforeg import InfoReg
from .joint import Joint
from .mla import MLA
from .mmpareto import MMPareto
from .mses import MSES
from .mslr import MSLR
from .ogm_ge import OGMGE
from .opm import OGM, OPM
from .pmr import PMR
from .reconboost import ReconBoost
from .relearning import Relearning
from .ugm import UGM
from .ume import UME
from .umt import UMT
from .unimodal import UniModal
from .unimodal_assist import UniModalAssist
from .valuation import Valuation

__all__ = ["AGM", "EpochData", "GBlending", "InfoReg", "Joint", "MLA", "MSES", "MSLR", "MMPareto", "Method", "OGM",
           "OGMGE", "OPM", "PMR", "ReconBoost", "Relearning", "UGM", "UME", "UMT", "UniModal", "UniModalAssist",
           "Valuation"]
