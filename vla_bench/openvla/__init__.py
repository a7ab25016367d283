"""The OpenVLA model family: conventions (action bins, normalization, gripper, prompt, image chain), the native
model, checkpoint loading/writing in the published layout, tiny CI configurations, and the `openvla` checkpoint kind.

Importing this package imports nothing heavy; torch is imported by the modules that need it.
"""
