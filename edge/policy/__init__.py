"""Exit decisions and their calibration: `calibrate` (thresholds for a target agreement, `coexit calibrate`,
`load_policy`), `gate` (the learned exit gate), `guarantee` (Learn-then-Test bounds), `adaptive` (the network-aware
policy over a calibrated frontier), `voting` (exit voting: the edge exits' distributions combined). The policy
contract itself (`ExitPolicy`) lives in coexit.exits, shared with the cloud. May import nothing else of edge."""
