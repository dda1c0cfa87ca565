"""vims.collector"""
