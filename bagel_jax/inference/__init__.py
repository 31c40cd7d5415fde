"""Inference: KV cache (`kv_cache`), cached decoder forward (`forward`), query blocks and the official three CFG
contexts (`contexts`), text decoding (`decode`), the Euler sampler with dual CFG (`sampler`), the
understanding / text-to-image / editing / think / interleaved API (`inferencer`), checkpoint loading (`model`)
and the `bagel-sample` / `bagel-chat` command lines (`cli`)."""
