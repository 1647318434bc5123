"""graftbuild: a declarative, incremental build system for LLM weights (GraftLLM SkillPacks)."""

__version__ = "0.1.0"
