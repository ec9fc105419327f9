"""`python -m appliance.speaker`: the stable command line of the CARP speaker (appliance.ha.speaker)."""
from appliance.ha.speaker import main

if __name__ == "__main__":
    raise SystemExit(main())
