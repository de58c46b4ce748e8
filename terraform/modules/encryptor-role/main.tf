data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  github_host  = "token.actions.githubusercontent.com"
  github_trust = var.github_repository != ""

  github_provider_arn = var.github_oidc_provider_arn != "" ? var.github_oidc_provider_arn : (
    var.create_github_oidc_provider ? aws_iam_openid_connect_provider.github[0].arn : "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:oidc-provider/${local.github_host}"
  )

  # One token subject per branch and per environment; never a repository-wide wildcard.
  github_subjects = concat(
    [for b in var.github_branches : "repo:${var.github_repository}:ref:refs/heads/${b}"],
    [for e in var.github_environments : "repo:${var.github_repository}:environment:${e}"],
  )

  name_pattern = var.secret_name_prefix == "" ? "*" : "${var.secret_name_prefix}/*"
}

resource "aws_iam_openid_connect_provider" "github" {
  count = var.create_github_oidc_provider ? 1 : 0

  url            = "https://${local.github_host}"
  client_id_list = ["sts.amazonaws.com"]
  tags           = var.tags
}

data "aws_iam_policy_document" "trust" {
  dynamic "statement" {
    for_each = local.github_trust ? [1] : []

    content {
      sid     = "GitHubActionsOIDC"
      effect  = "Allow"
      actions = ["sts:AssumeRoleWithWebIdentity"]

      principals {
        type        = "Federated"
        identifiers = [local.github_provider_arn]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.github_host}:aud"
        values   = ["sts.amazonaws.com"]
      }

      # StringLike so that branch patterns such as release/* work; the repository part is
      # fixed and validated, so a subject never matches another repository.
      condition {
        test     = "StringLike"
        variable = "${local.github_host}:sub"
        values   = local.github_subjects
      }
    }
  }

  dynamic "statement" {
    for_each = length(var.trusted_principal_arns) > 0 ? [1] : []

    content {
      sid     = "TrustedPrincipals"
      effect  = "Allow"
      actions = ["sts:AssumeRole"]

      principals {
        type        = "AWS"
        identifiers = var.trusted_principal_arns
      }
    }
  }
}

resource "aws_iam_role" "this" {
  name                 = var.name
  path                 = var.path
  description          = "kmskeys encryptor: Encrypt and GenerateDataKey with a kmskeys_name binding; never Decrypt"
  assume_role_policy   = data.aws_iam_policy_document.trust.json
  max_session_duration = var.max_session_duration
  permissions_boundary = var.permissions_boundary_arn
  tags                 = var.tags

  lifecycle {
    precondition {
      condition     = local.github_trust || length(var.trusted_principal_arns) > 0
      error_message = "Nobody could assume the role: set github_repository or trusted_principal_arns."
    }

    precondition {
      condition     = !local.github_trust || length(local.github_subjects) > 0
      error_message = "GitHub trust needs at least one branch or environment."
    }
  }
}

data "aws_iam_policy_document" "kms" {
  statement {
    sid       = "EncryptWithNameBinding"
    effect    = "Allow"
    actions   = ["kms:Encrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]

    condition {
      test     = "ForAnyValue:StringEquals"
      variable = "kms:EncryptionContextKeys"
      values   = ["kmskeys_name"]
    }

    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = ["false"]
    }

    condition {
      test     = "StringLike"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = [local.name_pattern]
    }
  }

  # Lets a CI job check the key it is about to use (aws kms describe-key); DescribeKey carries
  # no encryption context, so it cannot take the name condition.
  statement {
    sid       = "DescribeKey"
    effect    = "Allow"
    actions   = ["kms:DescribeKey"]
    resources = [var.kms_key_arn]
  }

  # Explicit deny: CI never decrypts, even if a broader policy is attached to the role later.
  # ReEncrypt would decrypt under another key, and a grant could hand Decrypt to itself.
  statement {
    sid       = "NeverDecrypt"
    effect    = "Deny"
    actions   = ["kms:Decrypt", "kms:ReEncrypt*", "kms:CreateGrant"]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "kms" {
  name   = "kmskeys-encrypt"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.kms.json
}
