"""Drop-ins for trainers: `megatron`, `verl`, `deepspeed` (import the one you use)."""
