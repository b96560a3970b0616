"""Build products: the verity-protected Core image and the Secure Boot-signed EFI binary."""
