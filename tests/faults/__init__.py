"""The fault-injection suite (kills, bad inputs, crafted checkpoints); faultkit holds its machinery."""
