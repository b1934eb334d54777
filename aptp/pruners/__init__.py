"""aptp.pruners"""
