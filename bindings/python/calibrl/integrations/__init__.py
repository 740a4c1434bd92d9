"""Drop-ins for trainers: `megatron`, `verl`, `trl`, `deepspeed` (import the one you use)."""
