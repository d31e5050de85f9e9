"""The ingress's clients of the state actors: the session store shards (``sessions``) and the
memory shards (``memory_client``; ``memory`` is what a request asks of memory and when), placed
by ``shard_handles``."""
