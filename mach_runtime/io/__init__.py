"""Checkpoints and experts: config and safetensors reading, expert layouts, the architecture registry and its
adapters, the routed-expert modules (stacked and streaming) and the expert bank. Nothing else lives here."""
