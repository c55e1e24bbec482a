"""Fleet config over MQTT (docs/fleet.md).

One module per concern: `envelope` (wire format, size cap, Ed25519), `policy`
(what remote config may set), `layers` (parse with the local parser, merge
order), `store` (atomic persistence in state_dir/fleet/), `report` (the status
document), `device` (the agent-side state machine) and `operator` (the
`edgeagent fleet` commands, which use paho directly and never run on a device).
"""
