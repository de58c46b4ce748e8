"""`kmskeys-resolver firewall`: keep the EC2 instance metadata service (IMDS) for root and the
resolver's users. model.py holds the shared types, nft.py and ipt.py the two backends, cli.py the
command (docs/firewall.md).
"""
