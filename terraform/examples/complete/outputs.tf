output "key_arn" {
  description = "The kmskeys key: --key-id of kmskeys encrypt."
  value       = try(module.kms_key.key_arn, null)
}

output "key_alias" {
  description = "Alias of the kmskeys key."
  value       = try(module.kms_key.alias_name, null)
}

output "ci_role_arn" {
  description = "role-to-assume for the CI workflow."
  value       = try(module.encryptor.role_arn, null)
}

output "host_role_arn" {
  description = "Role of the resolver hosts."
  value       = try(module.web_hosts.role_arn, null)
}

output "host_launch_template_id" {
  description = "Launch template that starts hardened resolver hosts."
  value       = try(module.web_hosts.launch_template_id, null)
}

output "seal_key_arn" {
  description = "The seal key of the stored: keystore, or null without enable_seal."
  value       = try(module.kms_key.seal_key_arn, null)
}
