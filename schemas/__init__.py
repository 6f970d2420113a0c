"""schemas/"""
