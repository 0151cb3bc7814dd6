"""File formats: references, lazy checkpoint reading, PEFT adapters, sharded writing, assets."""
