"""Budget tenants from ServiceTitan job ids (see servicetitan.md)."""
