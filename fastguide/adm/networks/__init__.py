"""ADM's networks (openai/guided-diffusion's unet.py and nn.py): the same classes, arguments and state_dict
keys, their flags and published configurations, and checkpoint loading. Nothing here imports sampling:
the integration with ADM's loops is fastguide.adm.integration."""
