"""RPO's pieces: the experience cache of reasoning paths and the truncation policy that cuts them."""
from rpo_engine.rpo.cache import CachedPath, ExperienceCache
from rpo_engine.rpo.truncation import Truncation, cut_cached_path, sample_truncation

__all__ = ["CachedPath", "ExperienceCache", "Truncation", "cut_cached_path", "sample_truncation"]
