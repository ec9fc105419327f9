"""Access-log reports: read Squid native logs (with rotations), count the figures in constant memory, render them."""
