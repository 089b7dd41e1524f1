"""Example configs (open-unlearning trainer YAML, accelerate DeepSpeed / FSDP), shipped as package data."""
