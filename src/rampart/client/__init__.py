"""The device side: configuration, transport, slots, boot entries, the update transaction."""
