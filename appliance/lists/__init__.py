"""Category list updates (`appliance lists update`): fetch, unpack safely, map, validate, compile, swap, reload."""
