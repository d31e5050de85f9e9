"""What the engine schedules: sequences, their KV blocks (``block_pool``), the iteration-level
scheduler, and ``n`` samples sharing a prompt (``siblings``)."""
