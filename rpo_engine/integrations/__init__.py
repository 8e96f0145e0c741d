"""rpo_engine's pieces inside other trainers: `rpo_engine.integrations.trl` (TRL's GRPOTrainer)."""
