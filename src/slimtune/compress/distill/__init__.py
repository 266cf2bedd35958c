"""Knowledge distillation: student construction, losses, teacher cache, recipe."""
