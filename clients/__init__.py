"""Flower ClientApp: thin glue from messages to fed_netgpt.training and fed_netgpt.evaluation.scoring."""
