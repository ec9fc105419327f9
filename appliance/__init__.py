"""The appliance node: config model, CLI, role engine, service control, CARP drivers."""
