"""`python -m appliance.lab origin|get|probe ...`: the helper programs the lab runs inside its namespaces."""
from appliance.lab.helpers import cli

cli(prog_name="python -m appliance.lab")
